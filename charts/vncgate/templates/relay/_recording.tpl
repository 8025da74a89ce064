{{- /*
Session recording (docs/RECORDING.md): the relay's flags, its volume mount and volume. Each is
one include in relay/deployment.yaml; the PersistentVolumeClaim is recordings-pvc.yaml.
*/ -}}
{{- define "vncgate.recordingsDir" -}}/var/lib/vncgate/recordings{{- end }}

{{- define "vncgate.recordingsClaim" -}}
{{- .Values.relay.recording.persistence.existingClaim | default (printf "%s-recordings" (include "vncgate.fullname" .)) }}
{{- end }}

{{- define "vncgate.relay.recordingArgs" -}}
{{- $rec := .Values.relay.recording }}
{{- if $rec.enabled }}
- --recording-dir={{ include "vncgate.recordingsDir" . }}
{{- if $rec.recordAll }}
- --record-sessions
{{- end }}
- --recording-keyframe-interval={{ $rec.keyframeInterval }}
{{- with $rec.maxAge }}
- --recording-max-age={{ . }}
{{- end }}
{{- with $rec.maxTotal }}
- --recording-max-total={{ . }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vncgate.relay.recordingVolumeMount" -}}
{{- if .Values.relay.recording.enabled }}
- name: recordings
  mountPath: {{ include "vncgate.recordingsDir" . }}
{{- end }}
{{- end }}

{{- define "vncgate.relay.recordingVolume" -}}
{{- if .Values.relay.recording.enabled }}
- name: recordings
  persistentVolumeClaim:
    claimName: {{ include "vncgate.recordingsClaim" . }}
{{- end }}
{{- end }}
