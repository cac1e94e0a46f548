"""The tiny test models live in ``scripts/tinymodel.py`` (scripts use them too, and scripts may not
import from tests); the tests keep importing them from here."""
from scripts.tinymodel import *  # noqa: F401,F403
