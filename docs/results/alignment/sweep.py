import sys, hashlib, itertools, json
from pathlib import Path
import numpy as np
sys.argv = ['x']
import detection as D
import ferkit.faces as F
from ferkit.predict import EmotionRecognizer

class Caching:
    def __init__(self, inner):
        self.inner, self.crop_scale, self.cache, self.counter = inner, inner.crop_scale, {}, [0]
        self.min_face, self.detect_max_side = inner.min_face, inner.detect_max_side
        inner.min_face = 1
    @property
    def calls(self): return self.counter[0]
    @calls.setter
    def calls(self, v): self.counter[0] = v
    def detect(self, image):
        key = (image.shape, hashlib.md5(image.tobytes()).hexdigest())
        self.counter[0] += 1
        if key not in self.cache:
            self.cache[key] = self.inner.detect(image)
        return [d for d in self.cache[key] if max(d.box[2:]) >= self.min_face]

rec = EmotionRecognizer()
det = Caching(rec.detector)
rec.detector = det
scenes = D.scene_photos(Path('/work/shared/data/fer2013'), int(sys.argv[1]) if len(sys.argv) > 1 else 1800)
configs = [dict(G=4.0, S=6.0, A=30.0, T=(20.0, 35.0), M=m) for m in (8.0, 12.0)]
for cfg in configs:
    F.ROLL_GAIN, F.SEARCH_TILT, F.SEARCH_TILT_ALONE, F.SEARCH_TURNS, F.MIN_TURN = cfg["G"], cfg["S"], cfg["A"], cfg["T"], cfg["M"]
    line = dict(cfg)
    for kind in ('upright', 'tilted'):
        found = right = 0
        det.calls = 0
        for sc in scenes:
            faces = rec.predict(sc[kind])
            m, _ = D.matched([f.box for f in faces], sc['centres'][kind], sc['sides'])
            for j, truth in zip(m, sc['labels']):
                found += j >= 0
                right += j >= 0 and rec.classes.index(faces[j].label) == truth
        line[kind] = (found, right, det.calls - len(scenes))
    print(json.dumps(line), flush=True)
