-- A receipt belongs to the subscriber that sent the document: the same
-- content from another subscriber is that subscriber's own document, and
-- must neither be answered with, nor tell anything about, the first one's.
-- Receipts from before this migration keep an empty subscriber.
CREATE TABLE exchange_receipt_by_subscriber (
    subscriber         TEXT NOT NULL,   -- the subscriber's meta.source
    digest             TEXT NOT NULL,
    claimed            TEXT NOT NULL,   -- RFC 3339, UTC
    document_reference TEXT,            -- the DocumentReference id once stored
    PRIMARY KEY (subscriber, digest)
);
INSERT INTO exchange_receipt_by_subscriber (subscriber, digest, claimed, document_reference)
    SELECT '', digest, claimed, document_reference FROM exchange_receipt;
DROP TABLE exchange_receipt;
ALTER TABLE exchange_receipt_by_subscriber RENAME TO exchange_receipt;
