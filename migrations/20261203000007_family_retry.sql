-- A refresh-token family remembers whether the token spent last was retried once after its
-- grace period (`rules::rotation::step`): a client whose answer was lost gets its successor
-- once more, and a second retry is a reuse.
ALTER TABLE token_families ADD COLUMN IF NOT EXISTS retried BOOLEAN NOT NULL DEFAULT false;
