"""The denoising network: two-stage U-Net, its STFT, loss, checkpoints and the Keras checkpoint importer.

Import from the submodules (`workbench.model.unet`, `.stft`, `.checkpoint`, `.keras_import`); this
package file stays light so that importing `workbench.model` does not pull in torch by itself.
"""
