"""Links and outbox stage of a worker's batch: what leaves the shard, after the commit.

Forwarded view updates are written to the shard's outbox in the batch's transaction, with
link sequence numbers per peer (the last used also in meta "link_out": the outbox is pruned,
and a restart must not start again at 1). After the commit they are sent through the peer
ring (`_pump_outbox`, in link-sequence order, from the outbox again after the peer
restarted); the peer applies each link seq once and publishes it in the control block, and
the outbox is pruned up to there. Change events go the same way through the change outbox,
one blob per transaction (changes.py publishes them after the commit).
"""

from __future__ import annotations

import logging

from .. import forwards
from ..control import Slot
from ..store import Batch

log = logging.getLogger("aggregator.worker")  # the worker's log lines, as before the split


class LinksStage:
    """Worker methods of the links/outbox stage (the state: `link_out`, `sent`, `unsent`...)."""

    def _write_links(self, batch: Batch) -> None:
        """Link sequences applied, the batch's forwarded updates into the outbox (link seqs
        after the last used, also kept in meta "link_out"), and the outbox pruned up to
        what each peer applied."""
        at = self.attempt
        for src, seq in at.link_in.items():
            batch.put_link(src, seq)
        for owner, updates in at.out.items():
            seq = self.link_out[owner]
            out = at.outmsg[owner] = []
            for msg in self._forward_messages(owner, seq, updates):
                seq += 1
                batch.put_outbox(owner, seq, msg)
                out.append((seq, msg))
        if at.outmsg:
            link_out = dict(self.link_out)
            link_out.update((owner, out[-1][0]) for owner, out in at.outmsg.items())
            batch.put_meta("link_out", link_out)
        for j in self.peer_out:
            acked = self.ctl.link_applied(j, self.index)
            if acked > self.pruned[j]:
                batch.prune_outbox(j, acked)
                at.pruned_out[j] = acked

    def _forward_messages(self, owner: int, last_seq: int, updates: list) -> list[bytes]:
        """The outbox messages (link seqs last_seq+1, ...) carrying `updates` (forwards.py):
        as many as it takes for each to fit the peer ring's largest message."""
        return forwards.encode(self.index, last_seq + 1, updates,
                               self.peer_out[owner].max_message)

    def _change_rows(self) -> list[tuple]:
        """The transaction's change events: (doc key, view id, key, version, data)."""
        chg = self.changes
        if not chg.coalesce:
            return self.attempt.changes
        rows = []
        bodies = self.attempt.bodies
        for dkey, updates in self.attempt.log.items():
            vid = dkey[2]
            if updates and chg.topics[vid] is not None:
                stored = self.attempt.docs[dkey]
                # the stored JSON body is the data (`_finish` stored the documents first)
                known = bodies.get(dkey) if chg.json else None
                data = known[1] if known is not None and known[0] == stored["v"] and \
                    known[1] is not None else chg.encode(stored["d"])
                rows.append((dkey, vid, dkey[3:].decode(), stored["v"], data))
        return rows

    def _write_changes(self, batch: Batch) -> None:
        """The transaction's change events into the outbox, as one blob keyed by their seq
        range; prune the blobs that were delivered whole."""
        rows = self._change_rows()
        if rows:
            first = self.change_seq + 1
            last = self.change_seq + len(rows)
            blob = self.changes.blob(rows, 1)  # fields after the doc key
            # without the data the commit's doc_log record holds (LZ4 unless off)
            logged = batch.logged_docs() if self._may_log_changes(batch, len(rows)) else None
            batch.put_changes(first, last, self.changes.stored(
                blob, rows, self.attempt.bodies, logged, batch.next_doc_log_key()))
            self.attempt.chg_out.append((first, last, blob))  # the publisher's: as it is
            batch.put_meta("change_seq", last)
        delivered = self.publisher.published
        if delivered > self.changes_pruned:
            batch.prune_changes(delivered)
            batch.put_meta("changes_published", delivered)
            self.attempt.pruned = delivered

    def _may_log_changes(self, batch: Batch, changes: int) -> bool:
        """May this commit's blob of `changes` change events leave out the data its
        ``doc_log`` record holds? A checkpoint rewrites the logged blobs not yet delivered
        with their data (store.write_doc_checkpoint), which costs more than writing them
        whole: not when two more commits like this one would reach the checkpoint (the
        last commits' blobs are usually not delivered by then), nor when the publisher is
        behind by more than a few such commits (a broker outage: they would all be)."""
        return batch.doc_log_bytes + 2 * batch.doc_log_txn_bytes < \
            self.cfg.service.doc_checkpoint_bytes and \
            self.publisher.backlog <= 4 * changes

    def _pump_outbox(self) -> None:
        """Send committed outbox messages to their shards, in link-sequence order."""
        self._check_fence()
        ctl, me = self.ctl, self.index
        for j, ring in self.peer_out.items():
            epoch = ctl.get(j, Slot.EPOCH)
            if epoch == 0:
                continue  # not booted yet: it resets its inbound ring at boot
            if epoch != self.peer_epoch[j]:
                self.peer_epoch[j] = epoch
                self.sent[j] = ctl.link_applied(j, me)
                self.unsent[j].clear()
            if self.sent[j] >= self.link_out[j]:
                continue
            queue = self.unsent[j]
            while queue and queue[0][0] <= self.sent[j]:
                queue.popleft()
            if not queue or queue[0][0] != self.sent[j] + 1:
                queue.clear()
                queue.extend(self.shard.outbox_after(j, self.sent[j]))
            while queue:
                seq, msg = queue[0]
                if not ring.try_put(msg):
                    break
                queue.popleft()
                self.sent[j] = seq
