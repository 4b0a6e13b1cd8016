"""What the pictures are drawn at and into: the dpi bounds analysis.check_dpi holds its callers to, and the image
path's format, both checked by the command line's options too. A module without torch, so that argparse checks --dpi
and --out without importing it."""

import os
import shutil

MIN_DPI = 10  # matplotlib cannot draw the labels' text at 5 or less; it is readable from about 72
# print quality. A figure's pixels grow as the dpi squared: the largest the commands draw, demo-attention's
# per-panel one (20 x 6.4 inches) and plot-delta's at 2048 frames, are 46 and 34 megapixels at 600 (and under a
# minute and 1.4 GB), the demo's 185 at 1200
MAX_DPI = 600


def image_path_problem(path: str):
    """Why matplotlib would not write the image named `path`, or None: a name without a suffix (matplotlib would add
    one and write another file), a format it does not write, or a .pgf image without the TeX it sets the text with
    (matplotlib refused those two once the figure was drawn). Without matplotlib, None: the drawing names the extra."""
    suffix = os.path.splitext(path)[1].strip(".").lower()
    if not suffix:
        return "has no suffix to name the image format (.png, .pdf, .svg); matplotlib would add one and write " \
               "another file"
    try:
        import matplotlib
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        return f"names a format matplotlib does not write, .{suffix} (formats: {', '.join(sorted(formats))})"
    texsystem = matplotlib.rcParams["pgf.texsystem"]
    if suffix == "pgf" and shutil.which(texsystem) is None:
        return f"is a .pgf image, which needs TeX ({texsystem}), not on the PATH"
    return None
