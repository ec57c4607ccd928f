-- Bumped by every change that can take access away (token revoked, principal disabled, group
-- membership changed); gateways poll it and drop their cached token checks when it moves.
CREATE TABLE revocation_epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);
INSERT INTO revocation_epoch (id, epoch) VALUES (1, 0);
