"""`python -m loadtest`'s list options take comma lists and space lists alike (`--users 1 16` once failed)."""

import pytest

from loadtest.__main__ import build_parser


@pytest.mark.parametrize("users", [["1", "16"], ["1,16"], ["1,", "16"]])
def test_users_as_a_comma_or_a_space_list(users):
    assert build_parser().parse_args(["--users", *users]).users == [1, 16]


def test_list_options_keep_their_defaults_and_flatten_mixed_forms():
    args = build_parser().parse_args(["--backends", "eager,onnxruntime", "fused", "--user-classes", "ModelInferUser"])
    assert args.backends == ["eager", "onnxruntime", "fused"]
    assert args.user_classes == ["ModelInferUser"]
    assert build_parser().parse_args([]).users == [1, 4, 16, 64]


def test_a_non_integer_step_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--users", "1", "many"])
    assert "--users" in capsys.readouterr().err
