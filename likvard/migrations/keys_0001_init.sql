-- The persons' data keys, each wrapped (encrypted) by the key-encryption key named in kek_id.
-- Destroying a key sets `wrapped` to NULL and records when and why: every field sealed with
-- it is then unreadable for good (crypto-shredding). A key's row stays, so an auditor can
-- see that it existed and when it was destroyed; the key itself is gone.
CREATE TABLE IF NOT EXISTS {schema}.data_keys (
    key_id        uuid PRIMARY KEY,
    person        text NOT NULL,
    kek_id        text NOT NULL,
    wrapped       bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    destroyed_at  timestamptz,
    legal_basis   text,
    CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL))
);

-- At most one live key per person: the one new details are sealed with.
CREATE UNIQUE INDEX IF NOT EXISTS data_keys_live_person
    ON {schema}.data_keys (person) WHERE destroyed_at IS NULL;
CREATE INDEX IF NOT EXISTS data_keys_person ON {schema}.data_keys (person);

-- A destroyed key never comes back: a row may only go from live to destroyed.
CREATE OR REPLACE FUNCTION {schema}.refuse_key_revival() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.destroyed_at IS NOT NULL THEN
        RAISE EXCEPTION 'data key % is destroyed: it cannot be changed', OLD.key_id;
    END IF;
    IF NEW.key_id <> OLD.key_id OR NEW.person <> OLD.person THEN
        RAISE EXCEPTION 'a data key keeps its id and person';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS data_keys_no_revival ON {schema}.data_keys;
CREATE TRIGGER data_keys_no_revival BEFORE UPDATE ON {schema}.data_keys
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_key_revival();
