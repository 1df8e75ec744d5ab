-- The task store's schema as the release before migrations created it (Base.metadata.create_all on SQLite,
-- made by that release's code), frozen for test/test_pgstore.py: a store made by it must upgrade in place.
CREATE TABLE tasks (
	id VARCHAR(32) NOT NULL,
	kind VARCHAR(16) NOT NULL,
	status VARCHAR(16) NOT NULL,
	request JSON NOT NULL,
	progress FLOAT NOT NULL,
	current_step INTEGER NOT NULL,
	total_steps INTEGER,
	epoch FLOAT,
	loss FLOAT,
	learning_rate FLOAT,
	tokens_per_second FLOAT,
	eta_seconds FLOAT,
	metrics JSON,
	error TEXT,
	output_dir TEXT,
	pid INTEGER,
	created_at DATETIME NOT NULL,
	started_at DATETIME,
	finished_at DATETIME,
	PRIMARY KEY (id)
);
CREATE INDEX ix_tasks_kind ON tasks (kind);
CREATE INDEX ix_tasks_status ON tasks (status);
CREATE INDEX ix_tasks_created_at ON tasks (created_at);
CREATE TABLE openai_files (
	id VARCHAR(48) NOT NULL,
	filename TEXT NOT NULL,
	purpose VARCHAR(32) NOT NULL,
	bytes INTEGER NOT NULL,
	created_at INTEGER NOT NULL,
	path TEXT NOT NULL,
	kind VARCHAR(16),
	records INTEGER NOT NULL,
	job_id VARCHAR(32),
	PRIMARY KEY (id)
);
CREATE INDEX ix_openai_files_purpose ON openai_files (purpose);
CREATE INDEX ix_openai_files_job_id ON openai_files (job_id);
CREATE INDEX ix_openai_files_created_at ON openai_files (created_at);
CREATE TABLE runs (
	id VARCHAR(32) NOT NULL,
	status VARCHAR(16) NOT NULL,
	base_model TEXT NOT NULL,
	base_path TEXT NOT NULL,
	lora JSON NOT NULL,
	seed INTEGER NOT NULL,
	vocab_size INTEGER NOT NULL,
	resume_from TEXT,
	resume_optimizer INTEGER NOT NULL,
	pending_grads INTEGER NOT NULL,
	steps INTEGER NOT NULL,
	device VARCHAR(64),
	pid INTEGER,
	error TEXT,
	created_at DATETIME NOT NULL,
	last_used_at DATETIME NOT NULL,
	PRIMARY KEY (id)
);
CREATE INDEX ix_runs_status ON runs (status);
CREATE TABLE run_checkpoints (
	id INTEGER NOT NULL,
	run_id VARCHAR(32) NOT NULL,
	name VARCHAR(64) NOT NULL,
	path TEXT NOT NULL,
	step INTEGER NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id)
);
CREATE INDEX ix_run_checkpoints_run_id ON run_checkpoints (run_id);
CREATE TABLE task_events (
	id INTEGER NOT NULL,
	task_id VARCHAR(32) NOT NULL,
	created_at DATETIME NOT NULL,
	type VARCHAR(16) NOT NULL,
	level VARCHAR(8) NOT NULL,
	message TEXT,
	data JSON,
	PRIMARY KEY (id),
	FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
CREATE INDEX ix_task_events_task_id ON task_events (task_id);
CREATE TABLE run_jobs (
	seq INTEGER NOT NULL,
	id VARCHAR(32) NOT NULL,
	run_id VARCHAR(32) NOT NULL,
	kind VARCHAR(24) NOT NULL,
	status VARCHAR(16) NOT NULL,
	request JSON NOT NULL,
	result JSON,
	error TEXT,
	created_at DATETIME NOT NULL,
	started_at DATETIME,
	finished_at DATETIME,
	PRIMARY KEY (seq),
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX ix_run_jobs_id ON run_jobs (id);
CREATE INDEX ix_run_jobs_run_id ON run_jobs (run_id);
CREATE INDEX ix_run_jobs_status ON run_jobs (status);
