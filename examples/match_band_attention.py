"""Optimize an input so its temporal attention map becomes a band matrix (VSTAR's appendix-B idea).

Instead of adding the Gaussian band to the scores in the forward pass, the optimization-based
variant changes the input (for VSTAR: the initial noise) until the attention over frames of a
frozen layer looks like the band that real videos show. Here the layer is a random frozen
query/key projection, the input is (positions, frames, channels), and the attention map comes
out of `vstar_kernels.tar_attention` itself: with v = the identity matrix, out = softmax(S').
The gradient of the mismatch flows through the kernel's backward into q and k, and on into x.

    python examples/match_band_attention.py --steps 150
    python examples/match_band_attention.py --strength 1 --sigma 1   # through TAR-regularized scores
"""

from __future__ import annotations

import argparse
import os

import torch

import vstar_kernels as vk


def attention_maps(x, wq, wk, heads: int, **tar):
    """softmax(S') of every (position, head): x (B, N, C) -> (B, heads, N, N)."""
    B, N, C = x.shape
    q = (x @ wq).view(B, N, heads, C // heads).transpose(1, 2)
    k = (x @ wk).view(B, N, heads, C // heads).transpose(1, 2)
    eye = torch.eye(N, device=x.device, dtype=x.dtype).expand(B, heads, N, N)  # v = I: out is the map
    return vk.tar_attention(q, k, eye, **tar)


def band_target(frames: int, sigma: float, device=None):
    """The Gaussian Toeplitz band with rows summing to one, like an attention map."""
    band = vk.gaussian_toeplitz(frames, sigma, device=device)
    return band / band.sum(dim=1, keepdim=True)


def diagonality(maps: torch.Tensor) -> float:
    """Weighted correlation of row and column index under the (mean) map: 1 for a diagonal map."""
    w = maps.reshape(-1, *maps.shape[-2:]).mean(0).double()
    w = w / w.sum()
    idx = torch.arange(w.shape[0], dtype=torch.float64, device=w.device)
    i, j = idx[:, None], idx[None, :]
    mi, mj = (w * i).sum(), (w * j).sum()
    cov = (w * (i - mi) * (j - mj)).sum()
    return (cov / ((w * (i - mi) ** 2).sum() * (w * (j - mj) ** 2).sum()).sqrt()).item()


def optimize(*, steps=150, positions=8, frames=16, channels=32, heads=2, target_sigma=1.5, lr=0.05,
             sigma=1.0, strength=0.0, backend="auto", seed=0, device="cpu", log_every=25, log=print):
    """Optimize x; returns dict(losses, diagonality_before, diagonality_after, target_diagonality)."""
    g = torch.Generator().manual_seed(seed)
    wq, wk = (torch.randn(channels, channels, generator=g).to(device) / channels ** 0.5 for _ in range(2))
    x = torch.randn(positions, frames, channels, generator=g).to(device).requires_grad_()
    target = band_target(frames, target_sigma, device=device)
    tar = dict(sigma=sigma, strength=strength, backend=backend)
    opt = torch.optim.Adam([x], lr=lr)
    with torch.no_grad():
        before = diagonality(attention_maps(x, wq, wk, heads, **tar))
    losses = []
    for step in range(steps):
        maps = attention_maps(x, wq, wk, heads, **tar)
        loss = (maps - target).square().sum(dim=(-2, -1)).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}; strength {strength} times a row's "
                                     "largest score can overflow float32 (docs/semantics.md): use a smaller strength")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.4f}")
    with torch.no_grad():
        after = diagonality(attention_maps(x, wq, wk, heads, **tar))
    return dict(losses=losses, diagonality_before=before, diagonality_after=after,
                target_diagonality=diagonality(target))


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=150, help="optimization steps (default: 150)")
    parser.add_argument("--frames", type=positive_int, default=16,
                        help="at least 2; also the head dim of v = I, so at most 256 with --backend triton "
                             "(default: 16)")
    parser.add_argument("--target-sigma", type=float, default=1.5, help="width of the target band (default: 1.5)")
    parser.add_argument("--sigma", type=float, default=1.0,
                        help="TAR width in the layer (inf: a flat bias; default: 1)")
    parser.add_argument("--strength", type=float, default=0.0,
                        help="TAR strength in the layer (0: plain map; default: 0)")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                        help="what computes the attention maps (default: auto); triton needs a CUDA device, or "
                             "TRITON_INTERPRET=1 on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the projections and the input (default: 0)")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error("--frames must be at least 2: one frame has no band to match")
    if not -2 ** 63 <= args.seed < 2 ** 64:  # what torch.manual_seed takes
        parser.error(f"--seed: must be an int from -2**63 to 2**64 - 1, got {args.seed}")
    for option, sigma, strength in (("--target-sigma", args.target_sigma, 1.0), ("--sigma", args.sigma, 1.0),
                                    ("--strength", 1.0, args.strength)):
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
        result = optimize(steps=args.steps, frames=args.frames, target_sigma=args.target_sigma, sigma=args.sigma,
                          strength=args.strength, backend=args.backend, seed=args.seed, device=device)
    except vk.BackendUnavailableError as exc:  # e.g. triton on a CPU without the interpreter, or past its head dim
        parser.error(f"--backend {args.backend}: {exc}")
    except FloatingPointError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    print(f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}; diagonality "
          f"{result['diagonality_before']:.3f} -> {result['diagonality_after']:.3f} "
          f"(target band {result['target_diagonality']:.3f})")
    return result


if __name__ == "__main__":
    main()
