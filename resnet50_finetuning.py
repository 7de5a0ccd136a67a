"""Fine-tune ResNet50 on its last 14 conv layers to tell real faces from StyleGAN fakes.

    python resnet50_finetuning.py --demo                  # offline, on synthetic faces
    python resnet50_finetuning.py                         # the full dataset, ImageNet weights
    python resnet50_finetuning.py --warmup-epochs 2       # train the head alone first, as the Keras guide does
    python resnet50_finetuning.py --predict face.jpg      # p(fake) of an image, with the trained model
    python resnet50_finetuning.py --evaluate --data-dir D # the trained model on D's real/ and fake/
    python resnet50_finetuning.py --help                  # every option

Training writes outputs/resnet50/ (model.keras, history.csv and history.png, metrics.json,
predictions.csv and the ROC, precision-recall and confusion-matrix figures) and adds
ResNet50's row to the results table, outputs/results.md.

The recipe below is all that is particular to this model. The fine-tuning itself, the
same for the four models, is the function `fine_tune` in load_pre_trained_models.py.
"""

import sys

from data_preprocessing import ModelRecipe, exits_on_user_error, parse_arguments, quiet_tensorflow_start

RECIPE = ModelRecipe(
    title="ResNet50",
    name="resnet50",
    # The pre-trained base is keras.applications.resnet50.ResNet50.
    keras_module="resnet50",
    constructor="ResNet50",
    # conv4_block5_3_conv to conv5_block3_3_conv: the end of stage 4 and all of stage 5.
    trainable_conv_layers=14,
    # The original code unfroze base.layers[-14:]: 4 conv layers and their batch
    # normalization layers, which then left inference mode.
    original_trainable_layers=14,
    imagenet_weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
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
