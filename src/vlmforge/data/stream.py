"""A corpus larger than memory, read as a stream a window of records at a time.

Sources are Hugging Face datasets (`hf:FOLDER`, `hf:FILE.parquet`, `hf:HUB_ID[:SUBSET][@SPLIT]`)
read with `datasets` streaming: parquet and arrow files in place, a `save_to_disk` folder through
its memory-mapped arrow files. Each rank reads its own part (`datasets.distributed.
split_dataset_by_node`: whole shards when their number divides by the ranks), the sources one after
another, epoch after epoch. Memory holds one window of records (and the images of the batches
being read), never the corpus.

The position of a stream is JSON: the epoch, the source, `datasets`' own state and the row count
at the start of the current window, and the window's number. Read again from a position, the same
window comes back with the same records, so a training run that saves it resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

from vlmforge.data.formats import DataError, Record, hf_record, is_source, open_dataset, source_folder


class RecordStream:
    """The records of `sources`, as rank `rank` of `world` reads them.

    Args:
        sources: `hf:` sources (a JSON file is read whole: write it as parquet to stream it).
        rank: this process's rank.
        world: ranks reading the sources together.
    """

    def __init__(self, sources: list[str], rank: int = 0, world: int = 1):
        for s in sources:
            if not is_source(s):
                raise DataError(
                    f"{s}: a streamed corpus is a Hugging Face dataset (hf:FOLDER, hf:FILE.parquet, hf:HUB_ID); a JSON "
                    "file is read whole (write it as parquet with `datasets`, or train without --train.streaming)"
                )
        if not sources:
            raise DataError("no data to stream")
        self.sources, self.rank, self.world = list(sources), rank, world

    def _open(self, k: int, state: dict | None):
        ds = open_dataset(self.sources[k], streaming=True)
        if self.world > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, self.rank, self.world)
        if state is not None:
            ds.load_state_dict(state)
        return ds

    def windows(
        self, size: int, start: dict | None = None, epochs: int | None = None
    ) -> Iterator[tuple[dict, list[Record]]]:
        """(position of the window's start, its records) from position `start`, for `epochs`
        passes (default: for ever): windows of `size` records; the last of an epoch may be shorter."""
        pos = dict(start or {"epoch": 0, "source": 0, "state": None, "row": 0, "window": 0})
        epoch, k, row, window = pos["epoch"], pos["source"], pos["row"], pos["window"]
        ds = self._open(k, pos["state"])
        rows, base = iter(ds), source_folder(self.sources[k])
        records, read_in_epoch = [], row > 0 or k > 0
        while True:
            try:
                item = next(rows)
            except StopIteration:
                k, row = k + 1, 0
                if k == len(self.sources):
                    if records:
                        yield pos, records
                    elif not read_in_epoch:
                        raise DataError(f"no records in {', '.join(self.sources)} (for rank {self.rank})") from None
                    if epochs is not None and epoch + 1 >= epochs:
                        return
                    epoch, k, window, records, read_in_epoch = epoch + 1, 0, 0, [], False
                    pos = {"epoch": epoch, "source": 0, "state": None, "row": 0, "window": 0}
                ds = self._open(k, None)
                rows, base = iter(ds), source_folder(self.sources[k])
                continue
            records.append(hf_record(item, row, self.sources[k], base))
            row, read_in_epoch = row + 1, True
            if len(records) == size:
                yield pos, records
                window += 1
                records = []
                pos = {"epoch": epoch, "source": k, "state": ds.state_dict(), "row": row, "window": window}

    def images(self) -> Iterator:
        """Every image path of one pass over the sources (for the feature store)."""
        for _, records in self.windows(4096, epochs=1):
            for r in records:
                yield from r.images
