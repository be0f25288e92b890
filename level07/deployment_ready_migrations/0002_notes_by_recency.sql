-- The default list order (pinned first, then most recently changed), answered from an index
-- instead of a sort of the whole table. A second migration rather than an edit of the first:
-- a migration that has run anywhere is never changed again (its checksum is recorded).
CREATE INDEX notes_by_recency ON notes (pinned DESC, updated_at DESC, id DESC);
