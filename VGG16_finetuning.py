"""Fine-tune VGG16 on its last 5 conv layers to tell real faces from StyleGAN fakes.

    python VGG16_finetuning.py --demo                  # offline, on synthetic faces
    python VGG16_finetuning.py                         # the full dataset, ImageNet weights
    python VGG16_finetuning.py --warmup-epochs 2       # train the head alone first, as the Keras guide does
    python VGG16_finetuning.py --predict face.jpg      # p(fake) of an image, with the trained model
    python VGG16_finetuning.py --evaluate --data-dir D # the trained model on D's real/ and fake/
    python VGG16_finetuning.py --help                  # every option

Training writes outputs/vgg16/ (model.keras, history.csv and history.png, metrics.json,
predictions.csv and the ROC, precision-recall and confusion-matrix figures) and adds
VGG16's row to the results table, outputs/results.md.

The recipe below is all that is particular to this model. The fine-tuning itself, the
same for the four models, is the function `fine_tune` in load_pre_trained_models.py.
"""

import sys

from data_preprocessing import ModelRecipe, exits_on_user_error, parse_arguments, quiet_tensorflow_start

RECIPE = ModelRecipe(
    title="VGG16",
    name="vgg16",
    # The pre-trained base is keras.applications.vgg16.VGG16.
    keras_module="vgg16",
    constructor="VGG16",
    # block4_conv2 to block5_conv3: the last two of block 4 and all three of block 5.
    trainable_conv_layers=5,
    # The original code unfroze base.layers[-5:], which hold only block5's 3 conv layers.
    original_trainable_layers=5,
    imagenet_weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
)


@exits_on_user_error
def main(argv=None):
    """Read and check the options before TensorFlow loads, then train, or apply the trained model."""
    args = parse_arguments(RECIPE, argv)
    with quiet_tensorflow_start():
        import load_pre_trained_models  # TensorFlow loads here, once the options are known to be right.

    return load_pre_trained_models.run(RECIPE, args)


if __name__ == "__main__":
    sys.exit(main())
