"""Fine-tune VGG16 on its last 5 conv layers to tell real faces from StyleGAN fakes.

    python VGG16_finetuning.py --demo                # an offline run on synthetic faces, under a minute
    python VGG16_finetuning.py                       # the full dataset, ImageNet weights
    python VGG16_finetuning.py --subset 500 --epochs 2 --img-size 128   # a quick CPU run
    python VGG16_finetuning.py --predict face.jpg    # p(fake) of an image, with the trained model
    python VGG16_finetuning.py --evaluate --data-dir D # the trained model on D's real/ and fake/
    python VGG16_finetuning.py --help                # every option

Outputs go to outputs/vgg16/ (model.keras, history.csv, history.png, metrics.json,
predictions.csv, roc.png, precision_recall.png, confusion_matrix.png) and the results
table to outputs/results.md.

The recipe below is all that is particular to this model; the steps of a run, from
finding the images to writing the results, are in load_pre_trained_models.fine_tune.
"""

import sys

import keras

from load_pre_trained_models import ModelRecipe, fine_tune

RECIPE = ModelRecipe(
    title="VGG16",
    name="vgg16",
    application=keras.applications.VGG16,
    preprocess_input=keras.applications.vgg16.preprocess_input,
    # block4_conv2 to block5_conv3: the last two of block 4 and all three of block 5.
    trainable_conv_layers=5,
    # The original code unfroze base.layers[-5:], which hold only block5's 3 conv layers.
    original_trainable_layers=5,
    imagenet_weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
)

if __name__ == "__main__":
    sys.exit(fine_tune(RECIPE))
