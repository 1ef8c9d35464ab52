"""Model towers and the DualEncoder. `DualEncoder(config)` builds the model of a config."""
from basic.models.dual_encoder import DualEncoder
from basic.models.dual_encoder import IMAGE_TOWERS
from basic.models.dual_encoder import TEXT_TOWERS
from basic.models.dual_encoder import temperature_from_params
