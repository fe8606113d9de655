"""--model checks that answer at once: a hub id that is neither cached nor reachable."""

from __future__ import annotations

import socket

import pytest

from crystal_ext.training import arguments


def test_unreachable_hub_fails_without_retries(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing is found there

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    downloads = []

    def must_not_download(*args, **kwargs):
        downloads.append(args)  # its retries take about 30 s without network
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", must_not_download)
    with pytest.raises(ValueError, match=r"--model someone/some-model: not a local folder.*hf download"):
        arguments.check_model_available("someone/some-model")
    assert downloads == [], "hf_hub_download was tried although the hub cannot be reached"


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        arguments.check_model_available(str(tmp_path))
