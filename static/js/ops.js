/* Ops pages: plots with Chart.js (vendored) and the live run page. */
(function () {
  "use strict";
  const PALETTE = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#1098ad", "#c92a2a", "#5c940d"];

  /* Axis and tooltip numbers people can read: 0.00002 as 2e-5, 134515008 as 134.5M, 0.123456 as 0.1235. */
  function readable(value) {
    const v = Number(value);
    if (!Number.isFinite(v)) return String(value);
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a < 1e-3) return v.toExponential(1).replace(".0e", "e");
    if (a >= 1e9) return `${(v / 1e9).toFixed(1)}B`;
    if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
    if (a >= 1e4) return `${(v / 1e3).toFixed(1)}k`;
    return String(Number(v.toPrecision(4)));
  }

  function lineChart(canvas, labels, datasets, options) {
    return new window.Chart(canvas, {
      type: "line",
      data: {
        labels,
        datasets: datasets.map((d, i) => ({
          borderColor: PALETTE[i % PALETTE.length],
          backgroundColor: PALETTE[i % PALETTE.length],
          borderWidth: 2,
          pointRadius: d.data.length > 40 ? 0 : 2,
          tension: 0.15,
          ...d,
        })),
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "nearest", intersect: false },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
        scales: { x: { ticks: { maxTicksLimit: 10 } } },
        ...(options || {}),
      },
    });
  }

  function overTime() {
    const canvas = document.querySelector("[data-chart=over-time]");
    const source = document.getElementById("over-time-data");
    if (!canvas || !source) return;
    const data = JSON.parse(source.textContent);
    const names = Object.keys(data.series);
    lineChart(canvas, data.labels, names.map((name) => ({ label: name, data: data.series[name] })), {
      scales: {
        x: { ticks: { maxTicksLimit: 10 }, title: { display: true, text: data.unit } },
        y: { beginAtZero: true, ticks: { callback: readable, precision: 0 }, title: { display: true, text: "total" } },
      },
    });
  }

  function learning() {
    const canvas = document.querySelector("[data-chart=learning]");
    const source = document.getElementById("learning-data");
    if (!canvas || !source) return;
    const data = JSON.parse(source.textContent);
    const names = Object.keys(data.series);
    const pct = (v) => `${Math.round(v * 100)}%`;
    const datasets = names.map((name) => ({
      label: name, data: data.series[name], spanGaps: true, pointRadius: 4, clip: false,
    }));
    datasets.push({
      label: "coin toss (50%)",
      data: data.labels.map(() => 0.5),
      borderColor: "#868e96",
      backgroundColor: "#868e96",
      borderDash: [5, 4],
      borderWidth: 1,
      pointRadius: 0,
    });
    lineChart(canvas, data.labels, datasets, {
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 12 } },
        tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${c.parsed.y === null ? "–" : pct(c.parsed.y)}` } },
      },
      scales: {
        x: { ticks: { maxTicksLimit: 12 }, title: { display: true, text: "round" } },
        y: { min: 0, max: 1, ticks: { callback: pct }, title: { display: true, text: "share" } },
      },
    });
  }

  function seriesToXY(points) {
    return points.map((p) => ({ x: p[0], y: p[1] }));
  }

  function renderRunCharts(container, charts, existing) {
    charts.forEach((chart) => {
      const names = Object.keys(chart.series);
      const datasets = names.map((name) => ({ label: name, data: seriesToXY(chart.series[name]) }));
      if (existing[chart.title]) {
        existing[chart.title].data.datasets.forEach((d, i) => { d.data = datasets[i] ? datasets[i].data : d.data; });
        existing[chart.title].update("none");
        return;
      }
      const card = document.createElement("section");
      card.className = "card chart-card";
      card.innerHTML = `<h3>${chart.title}</h3><div class="chart-box"><canvas></canvas></div>`;
      container.appendChild(card);
      existing[chart.title] = lineChart(card.querySelector("canvas"), undefined, datasets, {
        parsing: false,
        plugins: {
          legend: { position: "bottom", labels: { boxWidth: 12 } },
          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${readable(c.parsed.y)}` } },
        },
        scales: {
          x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
          y: { ticks: { callback: readable }, title: { display: true, text: chart.title } },
        },
      });
    });
  }

  function liveRun() {
    const root = document.querySelector("[data-run-live]");
    if (!root || !window.Chart) return;
    const charts = {};
    const container = root.querySelector("[data-run-charts]");
    const apply = (data) => {
      const bar = root.querySelector("[data-progress-bar]");
      const pct = data.total ? Math.round((100 * data.step) / data.total) : 0;
      bar.style.width = `${pct}%`;
      root.querySelector("[data-progress-text]").textContent = `${data.step} / ${data.total} steps (${pct}%)`;
      const log = root.querySelector("[data-run-log]");
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = data.log;
      if (atBottom) log.scrollTop = log.scrollHeight;
      const error = root.querySelector("[data-run-error]");
      error.textContent = data.error;
      error.hidden = !data.error || data.status === "cancelled";
      renderRunCharts(container, data.charts, charts);
      return data.finished;
    };
    const finished = apply(JSON.parse(document.getElementById("run-data").textContent));
    if (finished) return;
    const timer = setInterval(async () => {
      try {
        const response = await fetch(root.dataset.url, { headers: { Accept: "application/json" } });
        if (!response.ok) return;
        const data = await response.json();
        if (apply(data)) {
          clearInterval(timer);
          window.location.reload();
        }
      } catch (e) { /* the next poll tries again */ }
    }, 2000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!window.Chart) return;
    overTime();
    learning();
    liveRun();
  });
})();
