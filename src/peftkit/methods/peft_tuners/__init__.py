"""Methods that are one HF PEFT tuner each, over one shared base (base.py: apply, save, load,
merge, remove and switch-off through PEFT): (IA)3 (ia3.py), LoHa and LoKr (loha.py, lokr.py, with
their shared LyCORIS options in lycoris.py), VeRA (vera.py) and OFT (oft.py)."""

from peftkit.methods.peft_tuners.ia3 import IA3
from peftkit.methods.peft_tuners.loha import LOHA
from peftkit.methods.peft_tuners.lokr import LOKR
from peftkit.methods.peft_tuners.oft import OFT
from peftkit.methods.peft_tuners.vera import VERA

__all__ = ["IA3", "LOHA", "LOKR", "OFT", "VERA"]
