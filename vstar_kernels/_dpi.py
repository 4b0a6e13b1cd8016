"""The dpi the pictures are drawn at: the bounds analysis.check_dpi holds its callers to, and the command line's
--dpi. A module without torch, so that argparse checks --dpi without importing it."""

MIN_DPI = 10  # matplotlib cannot draw the labels' text at 5 or less; it is readable from about 72
# print quality. A figure's pixels grow as the dpi squared: the largest the commands draw, demo-attention's
# per-panel one (20 x 6.4 inches) and plot-delta's at 2048 frames, are 46 and 34 megapixels at 600 (and under a
# minute and 1.4 GB), the demo's 185 at 1200
MAX_DPI = 600
