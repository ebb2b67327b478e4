"""Small helpers every layer may import (nothing from the rest of the package)."""
