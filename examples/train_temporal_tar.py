"""Train a tiny temporal-attention model with TAR in its forward pass (runs on CPU in seconds).

The VSTAR authors suggest TAR as a regularizer for training the next video models. This
example trains a one-block temporal transformer to denoise synthetic "videos" (per-position
feature trajectories that move smoothly over frames): the attention over frames goes through
`vstar_kernels.tar_attention`, so its Gaussian band pulls each frame towards its neighbours
while the gradients flow through the regularized attention.

    python examples/train_temporal_tar.py --steps 60
    python examples/train_temporal_tar.py --backend triton   # CUDA, or CPU with TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import math
import os

import torch

import vstar_kernels as vk


class TemporalBlock(torch.nn.Module):
    """Pre-norm temporal self-attention (TAR-regularized) + MLP over x: (batch, frames, channels)."""

    def __init__(self, channels: int, heads: int, *, sigma: float, strength: float, backend: str):
        super().__init__()
        self.heads, self.sigma, self.strength, self.backend = heads, sigma, strength, backend
        self.norm1 = torch.nn.LayerNorm(channels)
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.proj = torch.nn.Linear(channels, channels)
        self.norm2 = torch.nn.LayerNorm(channels)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(channels, 2 * channels), torch.nn.GELU(),
                                       torch.nn.Linear(2 * channels, channels))

    def forward(self, x):
        B, N, C = x.shape
        # (B, N, 3, H, D) -> three (B, H, N, D) strided views: read in place by the kernel
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = vk.tar_attention(q, k, v, sigma=self.sigma, strength=self.strength, backend=self.backend)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class Denoiser(torch.nn.Module):
    def __init__(self, features: int, channels: int, heads: int, **tar):
        super().__init__()
        self.inp = torch.nn.Linear(features, channels)
        self.block = TemporalBlock(channels, heads, **tar)
        self.out = torch.nn.Linear(channels, features)

    def forward(self, noisy):
        return self.out(self.block(self.inp(noisy)))


def synthetic_videos(batch: int, frames: int, features: int, generator: torch.Generator):
    """Smooth trajectories: each feature is a random-phase sinusoid over frames, plus a drift."""
    t = torch.linspace(0, 1, frames)[None, :, None]
    freq = torch.rand(batch, 1, features, generator=generator) * 2 + 0.5
    phase = torch.rand(batch, 1, features, generator=generator) * 2 * math.pi
    drift = torch.randn(batch, 1, features, generator=generator)
    return torch.sin(2 * math.pi * freq * t + phase) + drift * t


def train(*, steps=60, batch=32, frames=16, features=8, channels=32, heads=2, sigma=2.0, strength=1.0,
          noise=0.5, lr=3e-3, backend="auto", seed=0, device="cpu", log_every=10, log=print):
    """Train the denoiser; returns the list of training losses (one per step)."""
    torch.manual_seed(seed)
    model = Denoiser(features, channels, heads, sigma=sigma, strength=strength, backend=backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        clean = synthetic_videos(batch, frames, features, data)
        noisy = clean + noise * torch.randn(clean.shape, generator=data)
        clean, noisy = clean.to(device), noisy.to(device)
        loss = torch.nn.functional.mse_loss(model(noisy), clean)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}; strength {strength} times a row's "
                                     "largest score can overflow float32 (docs/semantics.md): use a smaller strength")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=60, help="training steps (default: 60)")
    parser.add_argument("--frames", type=positive_int, default=16, help="frames of each video (default: 16)")
    parser.add_argument("--sigma", type=float, default=2.0, help="TAR width (inf: plain attention; default: 2)")
    parser.add_argument("--strength", type=float, default=1.0, help="TAR strength (0: plain attention; default: 1)")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                        help="what computes the attention (default: auto); triton needs a CUDA device, or "
                             "TRITON_INTERPRET=1 on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights; seed + 1 seeds the data "
                        "(default: 0)")
    args = parser.parse_args(argv)
    if not -2 ** 63 <= args.seed <= 2 ** 64 - 2:  # what torch.manual_seed takes, for seed + 1 too
        parser.error(f"--seed: must be an int from -2**63 to 2**64 - 2 (the data is seeded with seed + 1), "
                     f"got {args.seed}")
    for option, sigma, strength in (("--sigma", args.sigma, 1.0), ("--strength", 1.0, args.strength)):
        try:
            vk.LevelSpec(sigma=sigma, strength=strength)  # refused here, not after the model is built
        except ValueError as exc:
            parser.error(f"{option}: {exc}")
    if not abs(args.strength) <= torch.finfo(torch.float32).max:  # what the library takes for this float32 model
        parser.error(f"--strength: must be at most {torch.finfo(torch.float32).max!r} in size (the largest float32), "
                     f"got {args.strength}")
    # the Triton interpreter (TRITON_INTERPRET=1, as Triton reads it) takes CPU tensors
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "y", "yes", "on", "true")
    device = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    try:
        losses = train(steps=args.steps, frames=args.frames, sigma=args.sigma, strength=args.strength,
                       backend=args.backend, seed=args.seed, device=device)
    except vk.BackendUnavailableError as exc:  # e.g. triton on a CPU without the interpreter
        parser.error(f"--backend {args.backend}: {exc}")
    except FloatingPointError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} step" + "s" * (len(losses) != 1))
    return losses


if __name__ == "__main__":
    main()
