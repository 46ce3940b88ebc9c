-- One database per write service (its event store, outbox and what it knows of cases), one
-- for the read models and one for the access log (who read which case: kept apart so that
-- a service's credentials cannot rewrite it). Run by the postgres image's entrypoint from
-- /docker-entrypoint-initdb.d, once, when the data volume is empty (a new volume, or
-- `docker compose down -v`); on an existing volume create a missing database by hand.
-- Likvärd makes its schemas and tables itself (each process migrates at start).
--
-- The names are the ones docker-compose.yml's LIKVARD_DATABASE_URLs end with:
--   intake, referral, followup: the write services, their relays, consumers and ingest workers
--   projections: the projection worker and the reporting API
--   access_log: the access log (CaseAccessed) every API writes, and its relay
-- Everything connects as POSTGRES_USER here; in production give each service its own role
-- (and its own URL in the likvard-secrets Secret, deploy/k8s/secret.example.yaml).
CREATE DATABASE intake;
CREATE DATABASE referral;
CREATE DATABASE followup;
CREATE DATABASE projections;
CREATE DATABASE access_log;
