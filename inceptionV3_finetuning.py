"""Fine-tune InceptionV3 on its last 8 conv layers to tell real faces from StyleGAN fakes.

    python inceptionV3_finetuning.py --demo          # an offline run on synthetic faces, under a minute
    python inceptionV3_finetuning.py                 # the full dataset, ImageNet weights
    python inceptionV3_finetuning.py --predict face.jpg # p(fake) of an image, with the trained model
    python inceptionV3_finetuning.py --evaluate --data-dir D # the trained model on D's real/ and fake/
    python inceptionV3_finetuning.py --help          # every option

Outputs go to outputs/inceptionv3/ and the results table to outputs/results.md.

The recipe below is all that is particular to this model; the steps of a run, from
finding the images to writing the results, are in load_pre_trained_models.fine_tune.
"""

import sys

import keras

from load_pre_trained_models import ModelRecipe, fine_tune

RECIPE = ModelRecipe(
    title="InceptionV3",
    name="inceptionv3",
    application=keras.applications.InceptionV3,
    preprocess_input=keras.applications.inception_v3.preprocess_input,
    # The last 8 Conv2D layers in base.layers order: 8 of the 9 in the final "mixed10" block.
    trainable_conv_layers=8,
    # The original code unfroze base.layers[-5:]: Activation and Concatenate layers with no
    # weights, so only the head trained. That is why it scored 0.772 (see the README).
    original_trainable_layers=5,
    imagenet_weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    # InceptionV3's stem shrinks the image too much below 75 pixels.
    min_img_size=75,
)

if __name__ == "__main__":
    sys.exit(fine_tune(RECIPE))
