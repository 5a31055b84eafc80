"""`peftkit ui`: a local web app to estimate, train, compare and try adapters (docs/ui.md).

Gradio is an optional extra (`pip install 'peftkit[ui]'`); only app.py and the page modules import
it. The pages drive the CLI's own functions, and run training, comparisons, evaluation, merging and
export as `peftkit` child processes; they learn about methods only through the registry."""
