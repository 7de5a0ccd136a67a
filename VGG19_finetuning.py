"""Fine-tune VGG19 on its last 8 conv layers to tell real faces from StyleGAN fakes.

    python VGG19_finetuning.py --demo                # an offline run on synthetic faces, under a minute
    python VGG19_finetuning.py                       # the full dataset, ImageNet weights
    python VGG19_finetuning.py --predict face.jpg    # p(fake) of an image, with the trained model
    python VGG19_finetuning.py --evaluate --data-dir D # the trained model on D's real/ and fake/
    python VGG19_finetuning.py --help                # every option

Outputs go to outputs/vgg19/ and the results table to outputs/results.md.

The recipe below is all that is particular to this model; the steps of a run, from
finding the images to writing the results, are in load_pre_trained_models.fine_tune.
"""

import sys

import keras

from load_pre_trained_models import ModelRecipe, fine_tune

RECIPE = ModelRecipe(
    title="VGG19",
    name="vgg19",
    application=keras.applications.VGG19,
    preprocess_input=keras.applications.vgg19.preprocess_input,
    # block4_conv1 to block5_conv4: all four conv layers of blocks 4 and 5.
    trainable_conv_layers=8,
    # The original code unfroze base.layers[-5:], which hold only block5's 4 conv layers.
    original_trainable_layers=5,
    imagenet_weights_file="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
)

if __name__ == "__main__":
    sys.exit(fine_tune(RECIPE))
