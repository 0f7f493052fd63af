import onnx, numpy as np, time
from pathlib import Path
from bench.real_models import load
from worker.pipeline.search import space
from worker.pipeline.quantize.mixed_precision import Assignment
from worker.pipeline import graph, sensitivity
from worker.pipeline.step import StepContext
m = load("minilm", quick=True)
model = onnx.load(str(m.path)); graph.ensure_node_names(model)
fam = [f for f in space.default_families(True) if f.name.startswith("low rank")][0]
prep = sensitivity.prepared_copy(model)
names = fam.transformable(prep); print(len(names))
layer = [l for l in graph.weight_layers(prep, ops=("MatMul","Gemm")) if l.weight in names][0]
w = onnx.numpy_helper.to_array(graph.initializers(prep)[layer.weight])
t = time.time(); a = fam.transformed_weight(w, layer); print(layer, w.shape, a.shape, np.linalg.norm(a-w)/np.linalg.norm(w), time.time()-t)
ctx = StepContext(original=model, calibration={k:v for k,v in m.calibration.items() if k!="_labels"}, evaluation=None, target="cpu", workdir=Path("/tmp"), progress=lambda *a: None, cancelled=lambda: False, options={})
t=time.time(); res, work = space.build(model, fam, Assignment(), ctx); print("built", time.time()-t, res.model.ByteSize())
t=time.time(); res, work = space.build(model, fam, Assignment(weights={layer.weight: 8}), ctx); print("built", time.time()-t, res.model.ByteSize())
