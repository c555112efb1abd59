"""ftdist: distributed fine-tuning of causal language models.

Importing ftdist is cheap: deepspeed is imported only by ftdist.engine and ray
only by the Ray shells in ftdist.rl and launch/.
"""

__version__ = "0.1.0"
