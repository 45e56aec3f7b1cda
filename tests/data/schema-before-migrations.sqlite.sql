CREATE TABLE users (
	id INTEGER NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	password_hash VARCHAR(256) NOT NULL, 
	role VARCHAR(16) DEFAULT 'est' NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
CREATE TABLE ra_clients (
	id INTEGER NOT NULL, 
	fingerprint VARCHAR(64) NOT NULL, 
	subject TEXT NOT NULL, 
	labels TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (fingerprint)
);
CREATE TABLE devices (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	label VARCHAR(64) NOT NULL, 
	device_key VARCHAR(256) NOT NULL, 
	first_enrolled DATETIME NOT NULL, 
	last_enrolled DATETIME NOT NULL, 
	current_serial VARCHAR(64) NOT NULL, 
	requester VARCHAR(256) NOT NULL, 
	client_address VARCHAR(64) NOT NULL, 
	CONSTRAINT uq_devices_label_key UNIQUE (label, device_key)
);
CREATE TABLE sqlite_sequence(name,seq);
CREATE INDEX ix_devices_last_enrolled ON devices (last_enrolled);
CREATE INDEX ix_devices_device_key ON devices (device_key);
CREATE INDEX ix_devices_current_serial ON devices (current_serial);
CREATE TABLE audit_events (
	id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	event VARCHAR(32) NOT NULL, 
	outcome VARCHAR(16) NOT NULL, 
	actor VARCHAR(256) NOT NULL, 
	client_address VARCHAR(64) NOT NULL, 
	label VARCHAR(64) NOT NULL, 
	device VARCHAR(256) NOT NULL, 
	serial VARCHAR(64) NOT NULL, 
	detail TEXT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_audit_events_at ON audit_events (at);
CREATE INDEX ix_audit_events_device ON audit_events (device);
CREATE TABLE crls (
	number INTEGER NOT NULL, 
	this_update DATETIME NOT NULL, 
	next_update DATETIME NOT NULL, 
	der BLOB NOT NULL, 
	issuer VARCHAR(64), 
	PRIMARY KEY (number)
);
CREATE INDEX ix_crls_issuer_number ON crls (issuer, number);
CREATE TABLE auth_failures (
	subject VARCHAR(160) NOT NULL, 
	failures INTEGER NOT NULL, 
	last_failure DATETIME NOT NULL, 
	blocked_until DATETIME NOT NULL, 
	PRIMARY KEY (subject)
);
CREATE INDEX ix_auth_failures_last_failure ON auth_failures (last_failure);
CREATE TABLE certificates (
	serial VARCHAR(64) NOT NULL, 
	device_id INTEGER, 
	common_name VARCHAR(256) NOT NULL, 
	subject TEXT NOT NULL, 
	label VARCHAR(64) NOT NULL, 
	requester VARCHAR(256) NOT NULL, 
	operation VARCHAR(32) NOT NULL, 
	not_before DATETIME NOT NULL, 
	not_after DATETIME NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	revoked_at DATETIME, 
	revocation_reason VARCHAR(32), 
	issued_at DATETIME NOT NULL, 
	der BLOB NOT NULL, 
	issuer VARCHAR(64), 
	PRIMARY KEY (serial), 
	FOREIGN KEY(device_id) REFERENCES devices (id) ON DELETE SET NULL
);
CREATE INDEX ix_certificates_status_not_after_serial ON certificates (status, not_after, serial);
CREATE INDEX ix_certificates_device_id ON certificates (device_id);
CREATE INDEX ix_certificates_issued_at ON certificates (issued_at);
CREATE INDEX ix_certificates_not_after ON certificates (not_after);
CREATE INDEX ix_certificates_common_name ON certificates (common_name);
CREATE TABLE admin_sessions (
	token_hash VARCHAR(64) NOT NULL, 
	user_id INTEGER NOT NULL, 
	data TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	last_seen DATETIME NOT NULL, 
	PRIMARY KEY (token_hash), 
	FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
);
CREATE INDEX ix_admin_sessions_user_id ON admin_sessions (user_id);
CREATE INDEX ix_admin_sessions_last_seen ON admin_sessions (last_seen);
