# Hydra config package (makes pkg://lightning_mp.conf importable once installed).
