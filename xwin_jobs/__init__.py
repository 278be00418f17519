"""xwin-align stage jobs: what runs inside a stage pod (and locally). Kept light: heavy libraries load lazily."""

__version__ = "0.1.0"
