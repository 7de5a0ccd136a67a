"""Fine-tune ResNet50 on its last 14 conv layers to tell real faces from StyleGAN fakes.

    python resnet50_finetuning.py --demo             # an offline run on synthetic faces, under a minute
    python resnet50_finetuning.py                    # the full dataset, ImageNet weights
    python resnet50_finetuning.py --predict face.jpg # p(fake) of an image, with the trained model
    python resnet50_finetuning.py --evaluate --data-dir D # the trained model on D's real/ and fake/
    python resnet50_finetuning.py --help             # every option

Outputs go to outputs/resnet50/ and the results table to outputs/results.md.

The recipe below is all that is particular to this model; the steps of a run, from
finding the images to writing the results, are in load_pre_trained_models.fine_tune.
"""

import sys

import keras

from load_pre_trained_models import ModelRecipe, fine_tune

RECIPE = ModelRecipe(
    title="ResNet50",
    name="resnet50",
    application=keras.applications.ResNet50,
    preprocess_input=keras.applications.resnet50.preprocess_input,
    # conv4_block5_3_conv to conv5_block3_3_conv: the end of stage 4 and all of stage 5.
    trainable_conv_layers=14,
    # The original code unfroze base.layers[-14:]: 4 conv layers and their batch
    # normalization layers, which then left inference mode.
    original_trainable_layers=14,
    imagenet_weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
)

if __name__ == "__main__":
    sys.exit(fine_tune(RECIPE))
