"""`python -m mlx_clip.ui`: the local web app and JSON API (see __main__.py).

runs.py           the runs folder: status, history, config diffs, sweeps (framework-free)
model_service.py  loaded checkpoints and the one inference thread that batches requests (MLX)
api.py            the JSON API: /v1/embeddings, /v1/classify, /v1/search, /v1/captions
server.py         HTTP routes, limits and what may be served
static/           the page: index.html, app.js, charts.js (SVG curves), style.css; no CDN
"""
