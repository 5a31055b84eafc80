"""Text-to-SQL over a SYNTHETIC banking database: build it, ask it, run predictions safely, score.

One module per concern, each imported by its own name (this file re-exports nothing):

- `database`: the schema, the seeded rows, `build_database`, `default_database`, `render_schema`;
- `templates`: the hand-written question templates and the ones held out for evaluation;
- `compositions`: composed training questions (a select and filters per table);
- `examples`: the question set as prompt/response records, and the bundled `bank-sql` set;
- `sandbox`: `run_query`, read-only execution of untrusted SQL with a time limit;
- `suite`: the test suite of databases (other seeds, edge rows) for test-suite accuracy;
- `scoring`: exact match, execution accuracy and test-suite accuracy (`evaluate`);
- `rescore`: scores committed predictions again, without generating
  (`python -m peftkit.apps.text_to_sql.rescore FILE`)."""
