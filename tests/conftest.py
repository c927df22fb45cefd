import os
import sys

# Let test modules import shared helpers from each other (e.g. `from test_timm import tiny_vit`).
sys.path.insert(0, os.path.dirname(__file__))
