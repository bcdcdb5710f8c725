"""tunelab.errors: how a user error prints."""

from tunelab.errors import TunelabError


def test_error_str_is_one_line_with_where_and_fix():
    err = TunelabError("column 'label' not found", fix="pass --label-column", where="data.csv:1")
    assert str(err) == "data.csv:1: column 'label' not found (fix: pass --label-column)"
    assert (err.what, err.fix, err.where) == ("column 'label' not found", "pass --label-column", "data.csv:1")
    assert str(TunelabError("x", fix="y")) == "x (fix: y)"
    assert isinstance(err, Exception)
