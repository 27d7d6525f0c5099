// Kontext Restore's additions to the ComfyUI web UI (frontends 1.32 and 1.49).
//
// 1. Refresh (R) updates the pack's file pickers like core loaders. The frontend refreshes a
//    combo only when /object_info types it "COMBO"; Restore Image's lora_name also takes a
//    STRING link, so it is typed "COMBO,STRING" and was left with its old list.
// 2. Text the pack draws on its nodes (progress text) wraps between words: the frontend's text
//    preview breaks anywhere ("th e LoRA").
// 3. A template opens framed on its Read me at a zoom where text is drawn: the workflow names the
//    node in extra.kontext_restore.frame (workflows/workflow_layout.py). Frontend 1.49 fits the
//    whole graph when it opens a template, at a zoom where it draws blank boxes.
import { app } from "../../scripts/app.js";

const PACK_NODE = /^KontextRestore/;

function comboOptions(spec) {
  // [type, options]: a V3 combo that also takes links ("COMBO,STRING") keeps its list in options.
  if (!Array.isArray(spec) || typeof spec[0] !== "string") return null;
  if (!spec[0].split(",").includes("COMBO") || spec[0] === "COMBO") return null;
  return Array.isArray(spec[1]?.options) ? spec[1].options : null;
}

function refreshPackCombos(defs) {
  for (const node of app.graph?.nodes ?? []) {
    if (!PACK_NODE.test(node.type) || !node.widgets) continue;
    const input = defs?.[node.type]?.input ?? {};
    for (const widget of node.widgets) {
      if (widget.type !== "combo") continue;
      const values = comboOptions(input.required?.[widget.name] ?? input.optional?.[widget.name]);
      if (values) widget.options.values = values;
    }
  }
}

function frameReadMe() {
  const graph = app.graph;
  const wanted = graph?.extra?.kontext_restore;
  if (!wanted) return;
  delete graph.extra.kontext_restore; // a workflow the user saves keeps the user's own view
  const node = graph.nodes.find((n) => String(n.id) === String(wanted.frame));
  const canvas = app.canvas;
  if (!node || !canvas?.ds) return;
  const apply = () => {
    const el = canvas.canvas;
    const width = el.clientWidth || el.width;
    const height = el.clientHeight || el.height;
    const title = 30;
    // Full size where the page has room, never below where the frontend still draws text.
    const fit = Math.min((width - 120) / node.size[0], (height - 190) / (node.size[1] + title));
    const scale = Math.max(0.8, Math.min(wanted.scale ?? 1, fit));
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = 60 / scale - node.pos[0];
    canvas.ds.offset[1] = 150 / scale - (node.pos[1] - title);
    canvas.setDirty(true, true);
  };
  apply();
  // 1.49 may fit the view once more in the next frame.
  requestAnimationFrame(() => requestAnimationFrame(apply));
}

app.registerExtension({
  name: "KontextRestore.WebUI",
  setup() {
    const style = document.createElement("style");
    style.textContent =
      "/* The frontend's text preview (progress text) breaks anywhere: break between words. */\n" +
      "div.flex.flex-1.items-center.gap-2.break-all { word-break: normal; overflow-wrap: anywhere; }";
    document.head.appendChild(style);
  },
  async refreshComboInNodes(defs) {
    refreshPackCombos(defs);
  },
  async afterConfigureGraph() {
    frameReadMe();
  },
});
