"""The API reference of bpp_kernels: pdoc builds its HTML page from the docstrings (as
``python -m pdoc bpp_kernels -o docs/api`` does), every public op of ``bpp_kernels.__all__`` is on
it with its docstring, and every op's docstring carries an ``Example::`` block whose doctest runs."""
import doctest
import html
import re

import pytest

import bpp_kernels

OPS = [name for name in bpp_kernels.__all__ if callable(getattr(bpp_kernels, name))]


def _plain(text: str) -> str:
    """Docstring text without reST roles and inline-literal quotes, whitespace collapsed."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text).replace("``", "")
    return " ".join(text.split())


def _rendered_docstring(page: str, name: str) -> str:
    """The text of the docstring pdoc rendered in ``name``'s section of the page."""
    section = re.search(rf'<section id="{name}">(.*?)</section>', page, re.S)
    assert section, f"{name} has no section on the API page"
    doc = re.search(r'<div class="docstring">(.*?)</div>\s*$', section.group(1), re.S)
    assert doc, f"{name} has no rendered docstring on the API page"
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", doc.group(1))).split())


def _examples(name: str) -> list[doctest.DocTest]:
    return doctest.DocTestFinder(recurse=False).find(getattr(bpp_kernels, name), name, globs={})


def test_every_public_op_is_documented_with_an_example():
    assert len(OPS) >= 11, OPS
    for name in OPS:
        doc = getattr(bpp_kernels, name).__doc__ or ""
        paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
        assert any(p.startswith("Example") and p.endswith("::") for p in paragraphs), f"{name}: no 'Example::' block"
        assert sum(len(t.examples) for t in _examples(name)) >= 2, f"{name}: its example has no doctest lines"


@pytest.mark.parametrize("name", OPS)
def test_docstring_example_runs(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result.failed} of {result.attempted} lines failed"


def test_pdoc_builds_the_api_page(tmp_path):
    import pdoc

    pdoc.pdoc("bpp_kernels", output_directory=tmp_path)
    page = (tmp_path / "bpp_kernels.html").read_text()
    assert _plain(bpp_kernels.__doc__.splitlines()[0]) in " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())
    for name in OPS:
        rendered = _rendered_docstring(page, name)
        doc = getattr(bpp_kernels, name).__doc__
        summary = _plain(doc.split("\n\n")[0].splitlines()[0])
        assert summary in rendered, f"{name}: {summary!r} is not on its API page section"
        for test in _examples(name):
            for example in test.examples:
                line = " ".join(example.source.split())
                assert line in rendered, f"{name}: example line {line!r} is not on the API page"
