"""Task code for the Hydra recipes: a datamodule, a network and a LightningModule per task.

Installed as ``lightning_mp.recipes``. Nothing here mentions precision: the plugin is the only variable
when fp32, bf16 and fp16 are compared.
"""
