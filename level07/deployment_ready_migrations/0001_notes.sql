-- The notes table: level02/notes.py's, without its owner column, so that level 02's
-- render_note, sorts and filters read these rows unchanged.
CREATE TABLE notes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,   -- AUTOINCREMENT: ids are never reused
    title       TEXT    NOT NULL,
    body        TEXT    NOT NULL DEFAULT '',
    tags        TEXT    NOT NULL DEFAULT '[]',       -- a JSON array of lower-case strings
    pinned      INTEGER NOT NULL DEFAULT 0,
    archived    INTEGER NOT NULL DEFAULT 0,          -- level 02's flag; no route sets it here
    version     INTEGER NOT NULL DEFAULT 1,          -- +1 on every change; the ETag
    created_at  TEXT    NOT NULL,                    -- RFC 3339 UTC, fixed width: sorts as time
    updated_at  TEXT    NOT NULL
);
