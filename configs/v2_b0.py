"""EfficientNetV2-B0 on ImageNet: the official recipe, with V1's AutoAugment preprocessing
and the official code's progressive learning in config.progressive (4 stages, image size from
128 px to the final training size; dropout constant, no MixUp). The paper has no B models, so
there are no Table 6 values for them."""

from configs import base


def get_config():
    return base.v2_variant_config('efficientnetv2-b0', augment='autoaugment')
