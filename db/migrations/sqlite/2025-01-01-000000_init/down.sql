DROP TABLE attempts;
DROP TABLE tx_blobs;
DROP TABLE blob_chunks;
DROP TABLE blobs;
DROP TABLE transactions;
DROP TABLE sessions;
