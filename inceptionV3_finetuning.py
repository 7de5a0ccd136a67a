"""Fine-tune InceptionV3 on its last 8 conv layers to tell real faces from StyleGAN fakes.

    python inceptionV3_finetuning.py --demo                  # offline, on synthetic faces
    python inceptionV3_finetuning.py                         # the full dataset, ImageNet weights
    python inceptionV3_finetuning.py --warmup-epochs 2       # train the head alone first, as the Keras guide does
    python inceptionV3_finetuning.py --predict face.jpg      # p(fake) of an image, with the trained model
    python inceptionV3_finetuning.py --evaluate --data-dir D # the trained model on D's real/ and fake/
    python inceptionV3_finetuning.py --help                  # every option

Training writes outputs/inceptionv3/ (model.keras, history.csv and history.png, metrics.json,
predictions.csv and the ROC, precision-recall and confusion-matrix figures) and adds
InceptionV3's row to the results table, outputs/results.md.

The recipe below is all that is particular to this model. The fine-tuning itself, the
same for the four models, is the function `fine_tune` in load_pre_trained_models.py.
"""

import sys

from data_preprocessing import ModelRecipe, exits_on_user_error, parse_arguments, quiet_tensorflow_start

RECIPE = ModelRecipe(
    title="InceptionV3",
    name="inceptionv3",
    # The pre-trained base is keras.applications.inception_v3.InceptionV3.
    keras_module="inception_v3",
    constructor="InceptionV3",
    # The last 8 Conv2D layers in base.layers order: 8 of the 9 in the final "mixed10" block.
    trainable_conv_layers=8,
    # The original code unfroze base.layers[-5:]: Activation and Concatenate layers with no
    # weights, so only the head trained. That is why it scored 0.772 (see the README).
    original_trainable_layers=5,
    imagenet_weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    # InceptionV3's stem shrinks the image too much below 75 pixels.
    min_img_size=75,
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
