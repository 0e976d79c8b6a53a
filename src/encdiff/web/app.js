// The encdiff page: reads the model from GET /v1/model, generates through POST /v1/generate/stream (server-sent
// events read with fetch, so the request stays a POST), shows the decoded previews as they arrive and keeps every
// result in the gallery with a download link. No external resources: it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  select.appendChild(o);
}

async function loadModel() {
  const response = await fetch("/v1/model");
  model = await response.json();
  const cls = $("class");
  if (model.classes.length) {
    option(cls, "", "one of each");
    model.classes.forEach((name, i) => option(cls, String(i), String(name)));
  } else {
    option(cls, "", "(unconditional)");
    cls.disabled = true;
  }
  // The guidance kinds and decoders this model offers; an unconditional model without a guide has no guidance.
  model.guidance_kinds.forEach((kind) => option($("guidance_kind"), kind, kind));
  $("guidance_kind").value = model.guidance_kinds.includes(model.sampling.guidance_kind)
    ? model.sampling.guidance_kind : (model.guidance_kinds[0] || "");
  $("guidance_kind").disabled = model.guidance_kinds.length < 2;
  if (!model.guidance_kinds.length) {
    $("guidance").disabled = true;
    $("interval_lo").disabled = $("interval_hi").disabled = true;
  }
  model.decoders.forEach((name) => option($("decoder"), name, name));
  $("decoder").value = model.sampling.decoder;
  $("decoder").disabled = model.decoders.length < 2;
  model.samplers.forEach((name) => option($("sampler"), name, name));
  $("sampler").value = model.sampling.sampler;
  $("steps").value = model.sampling.steps;
  $("steps").max = model.limits.max_steps;
  $("num_images").max = model.limits.max_images;
  if (model.sampling.guidance_scale !== null) $("guidance").value = model.sampling.guidance_scale;
  if (model.sampling.guidance_interval) {
    [$("interval_lo").value, $("interval_hi").value] = model.sampling.guidance_interval;
  }
  if (model.guidance_built_in !== null) {
    $("guidance").value = model.guidance_built_in;
    $("guidance").disabled = true;
    $("guidance").title = "built into this distilled model";
    $("interval_lo").disabled = $("interval_hi").disabled = true;
  }
  $("model-line").textContent = `${model.image_size}x${model.image_size} images, ` +
    `${model.classes.length || "no"} classes, ${model.sampling.sampler} ${model.sampling.steps} steps by default`;
}

function request() {
  const body = { num_images: Number($("num_images").value), steps: Number($("steps").value), sampler: $("sampler").value };
  if ($("class").value !== "") body.class = Number($("class").value);
  if ($("guidance").value !== "" && !$("guidance").disabled) body.guidance = Number($("guidance").value);
  if (!$("guidance_kind").disabled) body.guidance_kind = $("guidance_kind").value;
  if (!$("decoder").disabled) body.decoder = $("decoder").value;
  const lo = $("interval_lo").value, hi = $("interval_hi").value;
  if ((lo !== "" || hi !== "") && !$("interval_lo").disabled) {
    body.guidance_interval = [lo === "" ? 0 : Number(lo), hi === "" ? model.sigma_max : Number(hi)];
  }
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function tile(png, caption, download) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + png;
  img.alt = caption;
  figure.appendChild(img);
  if (download) {
    const a = document.createElement("a");
    a.href = img.src;
    a.download = download;
    a.textContent = caption + " ↓";
    figure.appendChild(document.createElement("br"));
    figure.appendChild(a);
  }
  return figure;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function describe(detail) {
  if (Array.isArray(detail)) return detail.map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ");
  return String(detail);
}

function handle(kind, data) {
  if (kind === "progress") {
    $("progress").max = data.of;
    $("progress").value = data.step;
    $("progress-text").textContent = `step ${data.step} of ${data.of}`;
    if (data.previews) {
      $("previews").replaceChildren(...data.previews.map((png, i) => tile(png, `preview ${i + 1}`)));
    }
  } else if (kind === "result") {
    $("progress-text").textContent = `done in ${data.seconds} s`;
    const gallery = $("gallery");
    data.images.slice().reverse().forEach((image) => {
      const name = image.class === null ? `seed ${image.seed}` : `${image.class} ${image.seed}`;
      gallery.prepend(tile(image.png, name, `encdiff-${image.class ?? "image"}-${image.seed}.png`));
    });
    $("previews").replaceChildren();
  } else if (kind === "error") {
    showError(describe(data.detail));
  }
}

async function generate(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("generate").disabled = true;
  $("live").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = "waiting for the model…";
  try {
    const response = await fetch("/v1/generate/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()),
    });
    if (!response.ok) {
      const detail = await response.json().catch(() => ({ detail: response.statusText }));
      const retry = response.headers.get("Retry-After");
      showError(describe(detail.detail) + (retry ? ` (retry in ${retry} s)` : ""));
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const kind = (block.match(/^event: (.*)$/m) || [])[1];
        const data = (block.match(/^data: (.*)$/m) || [])[1];
        if (kind && data) handle(kind, JSON.parse(data));
      }
    }
  } catch (error) {
    showError(String(error));
  } finally {
    $("generate").disabled = false;
  }
}

$("settings").addEventListener("submit", generate);
loadModel().catch((error) => showError("could not load the model: " + error));
