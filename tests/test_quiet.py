"""engine.quiet hides the expected warnings by their text, and nothing else."""

import logging
import warnings

import engine  # noqa: F401  (importing the package installs the filters)
from engine import quiet


def test_expected_warnings_are_hidden_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        quiet._DONE = False  # catch_warnings reset the filters: install them inside the block
        quiet.silence_expected()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("MimoModelConfig is experimental and still under active development.", UserWarning)
        warnings.warn("something nobody expected", UserWarning)
        warnings.warn("Transformer Engine and Apex are not installed", DeprecationWarning)  # other category
    assert [str(w.message) for w in caught] == ["something nobody expected",
                                                "Transformer Engine and Apex are not installed"]


def test_module_scoped_entry_only_hides_that_module():
    with warnings.catch_warnings(record=True) as caught:
        quiet._DONE = False
        quiet.silence_expected()
        warnings.warn("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.", UserWarning)
    assert len(caught) == 1  # issued from this test module, not megatron-core's optimizer


def test_expected_log_records_are_dropped(caplog):
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        logger.warning("GPTModel could not build its output layer")
    assert [r.getMessage() for r in caplog.records] == ["GPTModel could not build its output layer"]
