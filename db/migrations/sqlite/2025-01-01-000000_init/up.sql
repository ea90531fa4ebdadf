-- One row per router process lifetime.
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    creation INTEGER NOT NULL,
    live BOOLEAN NOT NULL,
    last_update INTEGER NOT NULL,
    uri TEXT NOT NULL
);

-- AUTOINCREMENT: ids are never reused after GC, so stale in-process references cannot
-- alias a newer transaction.
CREATE TABLE transactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rest_id TEXT NOT NULL UNIQUE,
    json TEXT NOT NULL,
    input_done BOOLEAN NOT NULL DEFAULT FALSE,
    final_attempt_reason TEXT,
    creation_session_id INTEGER,
    lease_session_id INTEGER REFERENCES sessions(id),
    lease_generation INTEGER NOT NULL DEFAULT 0,
    creation INTEGER NOT NULL,
    last_update INTEGER NOT NULL,
    version INTEGER NOT NULL,
    -- 0 = as soon as possible (NOT NULL keeps ordering identical on both backends).
    next_attempt_time INTEGER NOT NULL DEFAULT 0,
    message_builder TEXT,
    notification BOOLEAN NOT NULL DEFAULT FALSE,
    -- The final attempt happened and the DSN question is still open.
    no_final_notification BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX transactions_dequeue ON transactions(next_attempt_time)
    WHERE lease_session_id IS NULL AND final_attempt_reason IS NULL;
CREATE INDEX transactions_notify ON transactions(id)
    WHERE notification AND no_final_notification;
CREATE INDEX transactions_lease ON transactions(lease_session_id)
    WHERE lease_session_id IS NOT NULL;
-- Lets recovery tell whether a dead session is still referenced.
CREATE INDEX transactions_creator ON transactions(creation_session_id);

CREATE TABLE blobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    length INTEGER NOT NULL DEFAULT 0,
    total INTEGER,
    creation INTEGER NOT NULL,
    last_update INTEGER NOT NULL
);

-- Content in bounded chunks: appends insert rows, nothing is ever rewritten whole.
CREATE TABLE blob_chunks (
    blob_id INTEGER NOT NULL REFERENCES blobs(id) ON DELETE CASCADE,
    chunk_offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (blob_id, chunk_offset)
);

-- Blob references; the row count per blob is its refcount.
CREATE TABLE tx_blobs (
    transaction_id INTEGER NOT NULL REFERENCES transactions(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    blob_id INTEGER NOT NULL REFERENCES blobs(id) ON DELETE RESTRICT,
    PRIMARY KEY (transaction_id, name)
);
CREATE INDEX tx_blobs_blob ON tx_blobs(blob_id);

CREATE TABLE attempts (
    transaction_id INTEGER NOT NULL REFERENCES transactions(id) ON DELETE CASCADE,
    attempt_id INTEGER NOT NULL,
    responses TEXT,
    creation INTEGER NOT NULL,
    last_update INTEGER NOT NULL,
    PRIMARY KEY (transaction_id, attempt_id)
);
