"""Head map: every head placed by what it does (UMAP / PCA of its features), clustered; selections edit the mask."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from analysis.head_map import DEFAULT_CLUSTERS, DEFAULT_METRICS, HeadMap
from analysis.importance import HEAD_METRICS
from ui import backend, plots, scaffold, session


def scatter(head_map: HeadMap, projection: str, colour_by: str) -> go.Figure:
    """The 2-D map; colour is the cluster (discrete) or a feature (continuous); hover names the head."""
    xy = head_map.umap if projection == "UMAP" else head_map.pca
    names = head_map.feature_names
    hover = [
        f"layer {layer}, head {head}<br>cluster {c}<br>"
        + "<br>".join(f"{n}: {v:.4g}" for n, v in zip(names, row, strict=True))
        for (layer, head), c, row in zip(head_map.heads, head_map.clusters, head_map.features, strict=True)
    ]
    common = {"mode": "markers", "hoverinfo": "text"}
    fig = go.Figure()
    if colour_by == "cluster":
        for c in sorted(set(head_map.clusters)):
            idx = [i for i, k in enumerate(head_map.clusters) if k == c]
            fig.add_trace(
                go.Scatter(
                    x=[xy[i][0] for i in idx],
                    y=[xy[i][1] for i in idx],
                    customdata=[list(head_map.heads[i]) for i in idx],
                    hovertext=[hover[i] for i in idx],
                    name=f"cluster {c}",
                    marker={"size": 9},
                    **common,
                )
            )
    else:
        column = names.index(colour_by)
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in xy],
                y=[p[1] for p in xy],
                customdata=[list(h) for h in head_map.heads],
                hovertext=hover,
                marker={
                    "size": 9,
                    "color": [row[column] for row in head_map.features],
                    "colorscale": "Viridis",
                    "colorbar": {"title": {"text": colour_by}},
                },
                showlegend=False,
                **common,
            )
        )
    if projection == "PCA":
        var = head_map.pca_explained_variance
        axes = (f"PC 1 ({100 * var[0]:.0f} % of variance)", f"PC 2 ({100 * var[1]:.0f} % of variance)")
    else:
        axes = ("UMAP 1 (no unit)", "UMAP 2 (no unit)")
    fig.update_layout(
        title=f"{projection} of {len(head_map.heads)} heads, coloured by {colour_by}",
        xaxis={"title": axes[0]},
        yaxis={"title": axes[1]},
        height=560,
        dragmode="lasso",
        **plots.LAYOUT,
    )
    return fig


def chosen_heads(event: object, head_map: HeadMap, clusters: list[int]) -> list[tuple[int, int]]:
    """Heads selected on the chart plus every head of the chosen clusters, each once, in layer order."""
    points = plots.selection_points(event)
    picked = {(int(p["customdata"][0]), int(p["customdata"][1])) for p in points if p.get("customdata")}
    picked |= {h for h, c in zip(head_map.heads, head_map.clusters, strict=True) if c in clusters}
    return sorted(picked)


lm = backend.model()
calib = backend.windows(lm, session.CALIB_TEXT)
a, b, c = st.columns([3, 1, 1])
metrics = a.multiselect(
    "Importance metrics among the features (ablation is slow: a pass per head)",
    list(HEAD_METRICS),
    default=list(DEFAULT_METRICS),
)
clusters = b.number_input("Clusters (k-means)", 2, 20, DEFAULT_CLUSTERS)
seed = c.number_input("Seed", 0, 2**31 - 1, 0, help="UMAP and k-means use it: the same seed draws the same map")
head_map = backend.head_map(lm, calib, metrics, int(clusters), int(seed))

a, b = st.columns([1, 2])
projection = a.radio("Projection", ["UMAP", "PCA"], horizontal=True)
colour_by = b.selectbox("Colour by", ["cluster", *head_map.feature_names])
figure = scatter(head_map, projection, colour_by)
event = st.plotly_chart(figure, key="head_map", on_select="rerun", selection_mode=("points", "box", "lasso"))
labels = [[None] * lm.shape.num_heads for _ in range(lm.shape.num_layers)]
for (layer, head), cluster in zip(head_map.heads, head_map.clusters, strict=True):
    labels[layer][head] = cluster
st.plotly_chart(plots.head_heatmap(labels, "Cluster of every head", "cluster", "value", lm.shape.num_heads))

st.subheader("Clusters")
st.dataframe(head_map.cluster_means())

st.subheader("Edit the mask")
whole = st.multiselect("Whole clusters", sorted(set(head_map.clusters)), key="map_clusters")
heads = chosen_heads(event, head_map, whole)
st.caption(
    f"{len(heads)} heads chosen: "
    + (", ".join(f"L{layer}.H{head}" for layer, head in heads[:40]) or "none")
    + (" …" if len(heads) > 40 else "")
)
prune, keep = st.columns(2)
mask = session.current_mask(lm)
prune.button(
    "Prune these heads",
    disabled=not heads,
    on_click=scaffold.safe(session.change_mask, lm, mask.with_heads(heads, False)),
)
keep.button(
    "Keep these heads",
    disabled=not heads,
    on_click=scaffold.safe(session.change_mask, lm, mask.with_heads(heads, True)),
)
st.caption(f"Editor's mask now: {mask.describe()}")
