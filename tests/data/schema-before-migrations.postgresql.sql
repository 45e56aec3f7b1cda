
CREATE TABLE public.admin_sessions (
    token_hash character varying(64) NOT NULL,
    user_id integer NOT NULL,
    data text NOT NULL,
    created_at timestamp without time zone NOT NULL,
    last_seen timestamp without time zone NOT NULL
);

CREATE TABLE public.audit_events (
    id integer NOT NULL,
    at timestamp without time zone NOT NULL,
    event character varying(32) NOT NULL,
    outcome character varying(16) NOT NULL,
    actor character varying(256) NOT NULL,
    client_address character varying(64) NOT NULL,
    label character varying(64) NOT NULL,
    device character varying(256) NOT NULL,
    serial character varying(64) NOT NULL,
    detail text NOT NULL
);

CREATE SEQUENCE public.audit_events_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.audit_events_id_seq OWNED BY public.audit_events.id;

CREATE TABLE public.auth_failures (
    subject character varying(160) NOT NULL,
    failures integer NOT NULL,
    last_failure timestamp without time zone NOT NULL,
    blocked_until timestamp without time zone NOT NULL
);

CREATE TABLE public.certificates (
    serial character varying(64) NOT NULL,
    device_id integer,
    common_name character varying(256) NOT NULL,
    subject text NOT NULL,
    label character varying(64) NOT NULL,
    requester character varying(256) NOT NULL,
    operation character varying(32) NOT NULL,
    not_before timestamp without time zone NOT NULL,
    not_after timestamp without time zone NOT NULL,
    status character varying(16) NOT NULL,
    revoked_at timestamp without time zone,
    revocation_reason character varying(32),
    issued_at timestamp without time zone NOT NULL,
    der bytea NOT NULL,
    issuer character varying(64)
);

CREATE TABLE public.crls (
    number integer NOT NULL,
    this_update timestamp without time zone NOT NULL,
    next_update timestamp without time zone NOT NULL,
    der bytea NOT NULL,
    issuer character varying(64)
);

CREATE TABLE public.devices (
    id integer NOT NULL,
    label character varying(64) NOT NULL,
    device_key character varying(256) NOT NULL,
    first_enrolled timestamp without time zone NOT NULL,
    last_enrolled timestamp without time zone NOT NULL,
    current_serial character varying(64) NOT NULL,
    requester character varying(256) NOT NULL,
    client_address character varying(64) NOT NULL
);

CREATE SEQUENCE public.devices_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.devices_id_seq OWNED BY public.devices.id;

CREATE TABLE public.ra_clients (
    id integer NOT NULL,
    fingerprint character varying(64) NOT NULL,
    subject text NOT NULL,
    labels text NOT NULL,
    created_at timestamp without time zone NOT NULL
);

CREATE SEQUENCE public.ra_clients_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.ra_clients_id_seq OWNED BY public.ra_clients.id;

CREATE TABLE public.users (
    id integer NOT NULL,
    name character varying(128) NOT NULL,
    password_hash character varying(256) NOT NULL,
    role character varying(16) DEFAULT 'est'::character varying NOT NULL,
    created_at timestamp without time zone NOT NULL
);

CREATE SEQUENCE public.users_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.users_id_seq OWNED BY public.users.id;

ALTER TABLE ONLY public.audit_events ALTER COLUMN id SET DEFAULT nextval('public.audit_events_id_seq'::regclass);

ALTER TABLE ONLY public.devices ALTER COLUMN id SET DEFAULT nextval('public.devices_id_seq'::regclass);

ALTER TABLE ONLY public.ra_clients ALTER COLUMN id SET DEFAULT nextval('public.ra_clients_id_seq'::regclass);

ALTER TABLE ONLY public.users ALTER COLUMN id SET DEFAULT nextval('public.users_id_seq'::regclass);

ALTER TABLE ONLY public.admin_sessions
    ADD CONSTRAINT admin_sessions_pkey PRIMARY KEY (token_hash);

ALTER TABLE ONLY public.audit_events
    ADD CONSTRAINT audit_events_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.auth_failures
    ADD CONSTRAINT auth_failures_pkey PRIMARY KEY (subject);

ALTER TABLE ONLY public.certificates
    ADD CONSTRAINT certificates_pkey PRIMARY KEY (serial);

ALTER TABLE ONLY public.crls
    ADD CONSTRAINT crls_pkey PRIMARY KEY (number);

ALTER TABLE ONLY public.devices
    ADD CONSTRAINT devices_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.ra_clients
    ADD CONSTRAINT ra_clients_fingerprint_key UNIQUE (fingerprint);

ALTER TABLE ONLY public.ra_clients
    ADD CONSTRAINT ra_clients_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.devices
    ADD CONSTRAINT uq_devices_label_key UNIQUE (label, device_key);

ALTER TABLE ONLY public.users
    ADD CONSTRAINT users_name_key UNIQUE (name);

ALTER TABLE ONLY public.users
    ADD CONSTRAINT users_pkey PRIMARY KEY (id);

CREATE INDEX ix_admin_sessions_last_seen ON public.admin_sessions USING btree (last_seen);

CREATE INDEX ix_admin_sessions_user_id ON public.admin_sessions USING btree (user_id);

CREATE INDEX ix_audit_events_at ON public.audit_events USING btree (at);

CREATE INDEX ix_audit_events_device ON public.audit_events USING btree (device);

CREATE INDEX ix_auth_failures_last_failure ON public.auth_failures USING btree (last_failure);

CREATE INDEX ix_certificates_common_name ON public.certificates USING btree (common_name);

CREATE INDEX ix_certificates_device_id ON public.certificates USING btree (device_id);

CREATE INDEX ix_certificates_issued_at ON public.certificates USING btree (issued_at);

CREATE INDEX ix_certificates_not_after ON public.certificates USING btree (not_after);

CREATE INDEX ix_certificates_status_not_after_serial ON public.certificates USING btree (status, not_after, serial);

CREATE INDEX ix_crls_issuer_number ON public.crls USING btree (issuer, number);

CREATE INDEX ix_devices_current_serial ON public.devices USING btree (current_serial);

CREATE INDEX ix_devices_device_key ON public.devices USING btree (device_key);

CREATE INDEX ix_devices_last_enrolled ON public.devices USING btree (last_enrolled);

ALTER TABLE ONLY public.admin_sessions
    ADD CONSTRAINT admin_sessions_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.certificates
    ADD CONSTRAINT certificates_device_id_fkey FOREIGN KEY (device_id) REFERENCES public.devices(id) ON DELETE SET NULL;

