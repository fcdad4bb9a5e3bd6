"""Models. Parameters carry *logical* axis names (see jaxvid/parallel/sharding.py); the mesh
placement is computed from config rules, so flax's eager placement by annotation is off."""

import flax

flax.config.update("flax_always_shard_variable", False)
