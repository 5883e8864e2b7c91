"""Gene list files: one symbol per line, as the reference's ``selected_gene_list.txt``.

One reader for every place a user hands napari-stem a gene list (a reference checkpoint's genes,
a training panel, an evaluation panel), so they all accept the same files and say the same thing
about a bad one.
"""

from __future__ import annotations

from pathlib import Path

from napari_stem.errors import StemError, describe_path


def read_gene_list(path: str | Path, error: type[StemError] = StemError) -> list[str]:
    """The genes of ``path`` in order; blank lines and ``#`` comments ignored.

    A missing or empty file, or a gene listed twice, raises ``error`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"gene list {describe_path(path)} does not exist; give a text file with one gene symbol per line.")
    genes = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    genes = [gene for gene in genes if gene]
    if not genes:
        raise error(f"gene list {describe_path(path)} is empty; give one gene symbol per line.")
    duplicates = sorted({gene for gene in genes if genes.count(gene) > 1})
    if duplicates:
        raise error(
            f"gene list {describe_path(path)} names {', '.join(duplicates[:10])} more than once; list each gene once."
        )
    return genes
