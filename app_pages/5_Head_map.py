"""Head map: every head placed by what it does (UMAP / PCA of its features), clustered; selections edit the mask."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from analysis.head_map import DEFAULT_CLUSTERS, DEFAULT_METRICS, HeadMap
from analysis.importance import HEAD_METRICS
from ui import backend, head_grids, plots, scaffold, session


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
                    marker={"size": 9, "color": plots.cluster_colour(c)},
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
        title=plots.title(f"{projection} of {len(head_map.heads)} heads, coloured by {colour_by}"),
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
st.caption(
    "Head features, once per choice of metrics (then from the disk cache): " + backend.head_map_job(lm).expected()
)
head_map = backend.head_map(lm, calib, metrics, int(clusters), int(seed))

a, b = st.columns([1, 2])
projection = a.radio("Projection", ["UMAP", "PCA"], horizontal=True)
colour_by = b.selectbox("Colour by", ["cluster", *head_map.feature_names])
figure = scatter(head_map, projection, colour_by)
event = st.plotly_chart(figure, key="head_map", on_select="rerun", selection_mode=("points", "box", "lasso"))
st.caption(
    "Heads close together behave alike. With colour by cluster, each cluster keeps its colour in the grid below; "
    "a cluster confined to a few layers is a family of heads worth pruning or keeping together."
)
st.plotly_chart(head_grids.cluster_grid(head_map.heads, head_map.clusters, lm.shape.num_layers, lm.shape.num_heads))
st.caption("Where each cluster sits in the model: the same colours as the map above.")

st.subheader("Clusters")
means = head_map.cluster_means()
st.dataframe(
    {
        "feature": ["heads", *(name.removeprefix("mean ") for name in list(means)[2:])],
        **{
            f"cluster {c}": [means["heads"][i], *(means[name][i] for name in list(means)[2:])]
            for i, c in enumerate(means["cluster"])
        },
    },
    column_config={
        f"cluster {c}": st.column_config.NumberColumn(format="%.4g", width="small") for c in means["cluster"]
    },
    hide_index=True,
    height=plots.table_height(len(means) - 1),
)
st.caption("Mean of every feature per cluster (one column per cluster), so that the table fits the page.")

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
