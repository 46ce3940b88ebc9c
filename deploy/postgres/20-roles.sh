#!/usr/bin/env bash
# The database roles (docs/security.md, "Database roles"), created once by the postgres
# image's entrypoint after 10-databases.sql, on an empty data volume. The same roles and
# database grants as `likvard db roles --database-per-service` (likvard/db_roles.py), which
# is what to run on a server made another way (a managed PostgreSQL, an existing volume).
#
#   likvard_owner       owns the databases, schemas and tables; the `migrate` service
#                       (`likvard db migrate`) alone connects as it
#   likvard_intake      intake's API, relay and ingest worker      (database intake)
#   likvard_keys        the persons' data keys, schema `keys`      (database intake)
#   likvard_referral    referral's processes                       (database referral)
#   likvard_followup    follow-up's processes                      (database followup)
#   likvard_projections the projection worker and reporting API    (database projections)
#   likvard_access_log  the access log every API writes, its relay (database access_log)
#
# What each may do inside its schema is granted by `likvard db migrate` (as the owner),
# after every migration. Passwords come from the container's environment (compose sets
# them from .env); none is written here. Sourced or run by the entrypoint: no `exit`.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v owner="$LIKVARD_OWNER_DB_PASSWORD" \
  -v intake="$LIKVARD_INTAKE_DB_PASSWORD" \
  -v keys="$LIKVARD_KEYS_DB_PASSWORD" \
  -v referral="$LIKVARD_REFERRAL_DB_PASSWORD" \
  -v followup="$LIKVARD_FOLLOWUP_DB_PASSWORD" \
  -v projections="$LIKVARD_PROJECTIONS_DB_PASSWORD" \
  -v access_log="$LIKVARD_ACCESS_LOG_DB_PASSWORD" <<'EOSQL'
CREATE ROLE likvard_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'owner';
CREATE ROLE likvard_intake LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'intake';
CREATE ROLE likvard_keys LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'keys';
CREATE ROLE likvard_referral LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'referral';
CREATE ROLE likvard_followup LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'followup';
CREATE ROLE likvard_projections LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'projections';
CREATE ROLE likvard_access_log LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'access_log';

ALTER DATABASE intake OWNER TO likvard_owner;
ALTER DATABASE referral OWNER TO likvard_owner;
ALTER DATABASE followup OWNER TO likvard_owner;
ALTER DATABASE projections OWNER TO likvard_owner;
ALTER DATABASE access_log OWNER TO likvard_owner;
REVOKE ALL ON DATABASE intake, referral, followup, projections, access_log FROM PUBLIC;
GRANT CONNECT, TEMPORARY, CREATE ON DATABASE intake, referral, followup, projections, access_log TO likvard_owner;
GRANT CONNECT ON DATABASE intake TO likvard_intake, likvard_keys;
GRANT CONNECT ON DATABASE referral TO likvard_referral;
GRANT CONNECT ON DATABASE followup TO likvard_followup;
GRANT CONNECT ON DATABASE projections TO likvard_projections;
GRANT CONNECT ON DATABASE access_log TO likvard_access_log;

\connect intake
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect referral
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect followup
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect projections
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect access_log
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
EOSQL
